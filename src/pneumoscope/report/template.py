"""The HTML page of the report (a Jinja2 template): inline CSS only, no scripts, no web fonts, so
the file opens offline and can be mailed or archived as one file."""

# HTML rows read better unbroken than split at 110 columns.
# ruff: noqa: E501

from __future__ import annotations

HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PneumoScope report: {{ title }}</title>
<style>
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --bg: #f5f7fa; --accent: #0b5394; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: #102a43; color: #fff; padding: 28px 40px 22px; }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 600; }
header .meta { color: #bcccdc; font-size: 13px; }
.warning { background: #fff4e5; border-left: 5px solid #e67e22; padding: 10px 16px; margin: 18px 0;
           border-radius: 4px; }
main { max-width: 1180px; margin: 0 auto; padding: 10px 32px 60px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 20px 26px;
          margin: 22px 0; }
h2 { margin: 0 0 12px; font-size: 20px; color: #102a43; border-bottom: 2px solid var(--line);
     padding-bottom: 6px; }
h3 { font-size: 16px; margin: 18px 0 8px; color: #243b53; }
p.lead, .note { color: var(--muted); font-size: 13.5px; }
nav.toc { columns: 3; font-size: 14px; }
nav.toc a { color: var(--accent); text-decoration: none; display: block; padding: 1px 0; }
nav.toc a:hover { text-decoration: underline; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; margin: 8px 0 4px; }
.card { flex: 1 1 180px; background: var(--bg); border-radius: 8px; padding: 12px 16px;
        border-top: 4px solid var(--accent); }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.card .value { font-size: 26px; font-weight: 600; }
.card .ci { font-size: 12px; color: var(--muted); }
table { border-collapse: collapse; font-size: 13.5px; margin: 6px 0 10px; }
table.board { width: 100%; font-size: 13px; }
table.board th { font-size: 12px; }
table.board th, table.board td { padding: 5px 6px; }
td.name { white-space: nowrap; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: #f0f4f8; font-weight: 600; color: #334e68; }
th:first-child, td:first-child { text-align: left; }
td .ci { display: block; font-size: 11px; color: var(--muted); white-space: nowrap; }
tr.ref td { background: #f3f9ff; }
.chip { display: inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 6px;
        vertical-align: -1px; }
.wide { overflow-x: auto; }
.figs { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.figs figure { margin: 0; }
img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12.5px; color: var(--muted); margin-top: 4px; max-width: 520px; }
.camgroups { display: grid; grid-template-columns: repeat(auto-fill, minmax(500px, 1fr)); gap: 10px 18px; }
.camgroup { margin: 4px 0 8px; }
.camgroup .examples { display: flex; flex-direction: column; gap: 8px; margin-top: 4px; }
.example { border: 1px solid var(--line); border-radius: 6px; padding: 6px; background: #fafbfc;
           width: fit-content; }
.example .row { display: flex; gap: 3px; }
.example .row img { width: 158px; }
.example .cap { font-size: 12px; color: var(--muted); margin-top: 4px; }
.missing { color: #9b2c2c; font-size: 12.5px; padding: 8px; }
.cardgrid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 16px; }
.modelcard { border-left: 6px solid var(--accent); padding: 4px 16px 8px; background: #fcfdfe;
             border-radius: 4px; border-top: 1px solid var(--line); border-right: 1px solid var(--line);
             border-bottom: 1px solid var(--line); }
dl { display: grid; grid-template-columns: 118px 1fr; gap: 5px 12px; margin: 6px 0; font-size: 13.5px; }
table.compact td { padding: 3px 8px; font-size: 13px; }
table.compact td.k { color: #334e68; text-align: left; }
dt { font-weight: 600; color: #334e68; }
dd { margin: 0; }
ul.limits { padding-left: 18px; margin: 0; }
ul.limits li { margin: 3px 0; }
.yes { color: #1e7b34; font-weight: 600; }
.no { color: #b42318; font-weight: 600; }
footer { text-align: center; color: var(--muted); font-size: 12px; margin: 30px 0; }
</style>
</head>
<body>
<header>
  <h1>PneumoScope report: {{ title }}</h1>
  <div class="meta">{{ summary.n_models }} model{{ "s" if summary.n_models != 1 }} &middot;
    {{ split }} split: {{ summary.n }} images ({{ summary.n_pneumonia }} pneumonia) &middot;
    generated {{ generated }} by PneumoScope {{ version }}</div>
</header>
<main>
<div class="warning"><strong>Research use only. Not a medical device.</strong> Pediatric chest films from a
  single centre; see the <a href="#model-cards">limitations</a> before reading any number as a
  clinical performance.</div>

<section id="summary">
  <h2>Summary</h2>
  <p>Best model by <em>validation</em> AUC (chosen without looking at the test split):
    <span class="chip" style="background: {{ summary.color }}"></span><strong>{{ summary.model }}</strong>
    (validation AUC {{ summary.val_auc }}).
    Its decision threshold, {{ summary.threshold }}, was chosen as {{ summary.threshold_method }} and
    applied unchanged to the test split.</p>
  <div class="cards">
    <div class="card" style="border-top-color: {{ summary.color }}"><div class="label">Test ROC-AUC</div>
      <div class="value">{{ summary.auc }}</div><div class="ci">95% CI {{ summary.auc_ci }}</div></div>
    <div class="card" style="border-top-color: {{ summary.color }}"><div class="label">Sensitivity</div>
      <div class="value">{{ summary.sensitivity }}</div><div class="ci">95% CI {{ summary.sensitivity_ci }}
      &middot; at threshold {{ summary.threshold }}</div></div>
    <div class="card" style="border-top-color: {{ summary.color }}"><div class="label">Specificity</div>
      <div class="value">{{ summary.specificity }}</div><div class="ci">95% CI {{ summary.specificity_ci }}
      &middot; at threshold {{ summary.threshold }}</div></div>
  </div>
  <h3>Contents</h3>
  <nav class="toc">
    <a href="#leaderboard">Leaderboard</a>
    <a href="#roc">ROC curves</a>
    <a href="#pr">Precision-recall curves</a>
    <a href="#confusion">Confusion matrices</a>
    <a href="#thresholds">Threshold: validation-chosen vs 0.5</a>
    {% if stress %}<a href="#stress">Robustness to acquisition changes</a>{% endif %}
    <a href="#reliability">Calibration (reliability)</a>
    <a href="#curves">Training curves</a>
    <a href="#subtypes">Per subtype and group</a>
    <a href="#data">Data</a>
    <a href="#cams">Grad-CAM panels</a>
    <a href="#faithfulness">Grad-CAM faithfulness</a>
    <a href="#model-cards">Model cards</a>
  </nav>
</section>

<section id="leaderboard">
  <h2>Leaderboard</h2>
  <p class="lead">Test split, at each model's validation-chosen threshold; 95% bootstrap confidence
    intervals below each value. ΔAUC: difference from the reference model ({{ reference }}, best
    validation AUC) with a paired bootstrap 95% CI; p-values from the DeLong test for correlated ROC
    curves and from the paired bootstrap.</p>
  <div class="wide"><table class="board">
    <tr><th>model</th><th>weights</th><th>val AUC</th><th>threshold</th><th>ROC-AUC</th><th>PR-AUC</th>
      <th>sensitivity</th><th>specificity</th><th>accuracy</th><th>F1</th><th>ΔAUC vs {{ reference }}</th>
      <th>p (DeLong)</th><th>p (bootstrap)</th></tr>
    {% for row in leaderboard %}
    <tr{% if row.reference %} class="ref"{% endif %}>
      <td class="name"><span class="chip" style="background: {{ row.color }}"></span><strong>{{ row.model }}</strong></td>
      <td>{{ row.weights }}</td><td>{{ row.val_auc }}</td><td>{{ row.threshold }}</td>
      {% for value, ci in row.cells %}<td>{{ value }}<span class="ci">{{ ci }}</span></td>{% endfor %}
      {% if row.reference %}<td>reference</td><td></td><td></td>
      {% else %}<td>{{ row.delta }}<span class="ci">{{ row.delta_ci }}</span></td>
      <td>{{ row.p_delong or "n/a" }}</td><td>{{ row.p_bootstrap or "n/a" }}</td>{% endif %}
    </tr>
    {% endfor %}
  </table></div>
</section>

<section id="roc-pr">
  <h2>ROC and precision-recall curves</h2>
  <div class="figs">
    <figure id="roc"><img alt="ROC curves of all models" src="{{ roc_png }}">
      <figcaption><strong>ROC.</strong> Test split. Filled circle: the validation-chosen operating point;
        open square: threshold 0.5. The dotted diagonal is a model that guesses.</figcaption></figure>
    <figure id="pr"><img alt="Precision-recall curves of all models" src="{{ pr_png }}">
      <figcaption><strong>Precision-recall.</strong> Precision depends on the prevalence (dotted line): at
        a clinic with fewer pneumonia cases it would be lower at the same sensitivity.</figcaption></figure>
  </div>
</section>

<section id="confusion">
  <h2>Confusion matrices</h2>
  <p class="lead">Test split at each model's validation-chosen threshold; percentages are per true class
    (so the diagonal shows specificity and sensitivity).</p>
  <div class="figs">
  {% for c in confusions %}
    <figure><img alt="confusion matrix of {{ c.model }}" src="{{ c.png }}" style="width: 300px">
      <figcaption><span class="chip" style="background: {{ c.color }}"></span>{{ c.model }}, threshold
        {{ c.threshold }}</figcaption></figure>
  {% endfor %}
  </div>
</section>

<section id="thresholds">
  <h2>Threshold: validation-chosen vs 0.5</h2>
  <p class="lead">The threshold is chosen on the validation split and frozen for test; 0.5 is shown for
    comparison with the literature. Test split, 95% CIs below.</p>
  <table>
    <tr><th>model</th><th>threshold</th><th>sensitivity</th><th>specificity</th><th>accuracy</th><th>F1</th></tr>
    {% for row in thresholds %}{% for p in row.points %}
    <tr>{% if loop.first %}<td rowspan="{{ row.points|length }}"><span class="chip"
        style="background: {{ row.color }}"></span><strong>{{ row.model }}</strong></td>{% endif %}
      <td>{{ p.label }}</td>
      <td>{{ p.sensitivity }}<span class="ci">{{ p.sensitivity_ci }}</span></td>
      <td>{{ p.specificity }}<span class="ci">{{ p.specificity_ci }}</span></td>
      <td>{{ p.accuracy }}<span class="ci">{{ p.accuracy_ci }}</span></td>
      <td>{{ p.f1 }}<span class="ci">{{ p.f1_ci }}</span></td></tr>
    {% endfor %}{% endfor %}
  </table>
</section>

{% if stress %}
<section id="stress">
  <h2>Robustness to acquisition changes (validation)</h2>
  <p class="lead">The validation images re-scored after fixed changes in how a film looks (exposure,
    blur, noise, JPEG compression, resolution, equalisation, sharpening), at the same frozen threshold.
    A specificity that falls under a change warns that normal films made differently may be called
    pneumonia. Specificity / sensitivity; no test image is used.</p>
  <div class="wide"><table>
    <tr><th>model</th><th>threshold</th>{% for name, _, _ in stress[0].cells %}<th>{{ name }}</th>{% endfor %}</tr>
    {% for row in stress %}
    <tr><td><span class="chip" style="background: {{ row.color }}"></span><strong>{{ row.model }}</strong></td>
      <td>{{ row.threshold }}</td>
      {% for _, spec, sens in row.cells %}<td>{{ spec }} / {{ sens }}</td>{% endfor %}</tr>
    {% endfor %}
  </table></div>
</section>
{% endif %}

<section id="reliability">
  <h2>Calibration (reliability)</h2>
  <div class="figs"><figure><img alt="reliability diagram" src="{{ reliability_png }}">
    <figcaption>Mean predicted probability vs the observed fraction of pneumonia per bin (test split);
      points on the diagonal are well calibrated. ECE: expected calibration error (lower is better). The
      bars below count the images per bin (log scale). Training prevalence (74%) differs from the
      test prevalence, which alone shifts calibration.</figcaption></figure></div>
</section>

<section id="curves">
  <h2>Training curves</h2>
  {% if curves_png %}
  <div class="figs"><figure><img alt="training curves" src="{{ curves_png }}" style="max-width: 960px">
    <figcaption>Per epoch, from each run's epochs.csv. The model kept is the epoch with the best
      validation AUC.</figcaption></figure></div>
  {% else %}<p class="note">No per-epoch history found (epochs.csv).</p>{% endif %}
</section>

<section id="subtypes">
  <h2>Per subtype and group</h2>
  <h3>Recall per pneumonia subtype (test split)</h3>
  <table>
    <tr><th>model</th><th>bacteria: n</th><th>sensitivity</th><th>virus: n</th><th>sensitivity</th>
      <th>normal: n</th><th>specificity</th></tr>
    {% for row in subtypes %}
    <tr><td><span class="chip" style="background: {{ row.color }}"></span>{{ row.model }}</td>
      {% for name, n, value in row.cells %}<td>{{ n if n is not none else "–" }}</td><td>{{ value }}</td>{% endfor %}</tr>
    {% endfor %}
  </table>
  <p class="note">Subtype from the file names of the public release; at the validation-chosen threshold.</p>
  <h3>Per group</h3>
  {% if groups %}
  {% for g in groups %}
  <p><span class="chip" style="background: {{ g.color }}"></span><strong>{{ g.model }}</strong> by {{ g.column }}</p>
  <table><tr><th>{{ g.column }}</th><th>images</th><th>pneumonia</th><th>sensitivity</th><th>specificity</th><th>AUC</th></tr>
    {% for r in g.rows %}<tr><td>{{ r.key }}</td><td>{{ r.n }}</td><td>{{ r.n_pneumonia }}</td>
      <td>{{ r.sensitivity }}</td><td>{{ r.specificity }}</td><td>{{ r.auc }}</td></tr>{% endfor %}
  </table>
  {% endfor %}
  {% else %}<p class="note">No per-group breakdown in these runs (train or evaluate with
    <code>--manifest CSV --group-by COLUMN</code> to get one, e.g. by sex, age band or device).</p>{% endif %}
</section>

<section id="data">
  <h2>Data</h2>
  {% if splits %}
  <table>
    <tr><th>split</th><th>images</th><th>normal</th><th>pneumonia</th><th>pneumonia share</th>
      <th>patients</th><th>normal patients</th><th>pneumonia patients</th></tr>
    {% for s in splits %}<tr><td>{{ s.split }}</td><td>{{ s.images }}</td><td>{{ s.normal_images }}</td>
      <td>{{ s.pneumonia_images }}</td><td>{{ "%.1f%%"|format(100 * s.pneumonia_share) if s.pneumonia_share is not none }}</td>
      <td>{{ s.patients }}</td><td>{{ s.normal_patients }}</td><td>{{ s.pneumonia_patients }}</td></tr>{% endfor %}
  </table>
  <p class="note">From the run's <code>splits/*.csv</code>{% if same_split %}; all models used this same
    split{% else %} of {{ reference }} (<strong>the models did not all use the same split</strong>){% endif %}.
    Validation is a stratified, patient-grouped share of the training pool: no patient is in two splits.
    {% for name, d in data_json.items() %}{% if d.unreadable_skipped %} {{ d.unreadable_skipped }} unreadable
    {{ name }} image(s) were skipped.{% endif %}{% endfor %}</p>
  {% else %}<p class="note">No splits/ folder in the run.</p>{% endif %}
</section>

<section id="cams">
  <h2>Grad-CAM panels</h2>
  <p class="lead">Where the evidence for the pneumonia logit sits, for the {{ cam_examples }} most confident
    true positives, true negatives, false positives and false negatives of each model (test split). Each
    example: the X-ray, then Grad-CAM and Grad-CAM++ overlays (red = most relevant, scaled per image, so
    colours are not comparable between images). A map on the lungs is reassuring; one on text markers,
    borders or outside the body points to shortcut learning. For a NORMAL call the map shows the (weak)
    evidence for pneumonia, which may be none at all.</p>
  {% if cam_note %}<p class="note">{{ cam_note }}</p>{% endif %}
  {% for m in cams %}
  <h3><span class="chip" style="background: {{ m.color }}"></span>{{ m.model }}</h3>
  {% if m.note %}<p class="missing">{{ m.note }}</p>{% endif %}
  <div class="camgroups">
  {% for g in m.groups %}
  <div class="camgroup"><strong>{{ g.title }}</strong> <span class="note">({{ g.meaning }})</span>
    {% if not g.examples %}<p class="note">None in the test split.</p>{% endif %}
    <div class="examples">
    {% for ex in g.examples %}
      <div class="example">
        {% if ex.note %}<div class="missing">Panel skipped: {{ ex.note }}</div>
        {% else %}<div class="row">{% for label, src in ex.images %}<img alt="{{ label }} of {{ ex.file }}"
          src="{{ src }}">{% endfor %}</div>{% endif %}
        <div class="cap">{{ ex.file }}{% if ex.subtype %} ({{ ex.subtype }}){% endif %} &middot;
          p(pneumonia) = {{ "%.3f"|format(ex.prob) }}</div>
      </div>
    {% endfor %}
    </div></div>
  {% endfor %}
  </div>
  {% endfor %}
</section>

<section id="faithfulness">
  <h2>Grad-CAM faithfulness</h2>
  <p class="lead">ROAD (remove and debias): the drop of the pneumonia logit when the X% most relevant
    pixels of the map are removed (filled in from their neighbours) minus the drop when the X% least
    relevant are. A positive gap means the map points at pixels the model really uses. Averaged over a
    random sample of test images.</p>
  {% if faithfulness %}
  <table>
    <tr><th>model</th><th>method</th><th>images</th>{% for p in percentiles %}<th>gap {{ p }}%</th>{% endfor %}
      <th>mean gap</th><th>faithful</th></tr>
    {% for r in faithfulness %}
    <tr><td><span class="chip" style="background: {{ r.color }}"></span>{{ r.model }}</td><td>{{ r.label }}</td>
      <td>{{ r.n }}</td>{% for p in percentiles %}<td>{{ "%+.3f"|format(r.gap[p]) }}</td>{% endfor %}
      <td><strong>{{ "%+.3f"|format(r.mean_gap) }}</strong></td>
      <td class="{{ 'yes' if r.faithful else 'no' }}">{{ "yes" if r.faithful else "no" }}</td></tr>
    {% endfor %}
  </table>
  {% else %}<p class="note">Not measured{% if cam_note %} ({{ cam_note }}){% endif %}.</p>{% endif %}
  {% for m in cams %}{% if m.faithfulness_note %}<p class="note">{{ m.model }}: {{ m.faithfulness_note }}</p>{% endif %}{% endfor %}
</section>

<section id="model-cards">
  <h2>Model cards</h2>
  <div class="cardgrid">
  {% for c in cards %}
  <div class="modelcard" style="border-left-color: {{ c.color }}">
    <h3>{{ c.model }}</h3>
    <dl>
      <dt>Intended use</dt><dd>Research on pediatric chest X-ray pneumonia classification (NORMAL vs
        PNEUMONIA, frontal films). Not for clinical use.</dd>
      <dt>Model</dt><dd>{{ c.model }} (timm), one pneumonia logit; weights: {{ c.weights or "n/a" }};
        input {{ c.image_size or "?" }} px grayscale{% if c.epochs %}; {{ c.epochs }} epoch(s){% endif %}{%
        if c.wall_time %}, {{ "%.0f"|format(c.wall_time) }} s{% endif %}.</dd>
      <dt>Data</dt><dd>Kermany et al. pediatric chest X-rays (Guangzhou Women and Children's Medical
        Center; single site, patients aged 1–5).
        {% for name, d in c.data.items() %}{{ name }}: {{ d.images }} images, {{ d.pneumonia }} pneumonia,
        {{ d.patients }} patients{{ "; " if not loop.last else "." }}{% endfor %}</dd>
      <dt>Decision threshold</dt><dd>{{ c.threshold }}: {{ c.threshold_method }}; frozen for the test
        split. Validation AUC {{ c.val_auc }}.</dd>
      <dt>Test metrics</dt><dd><table class="compact">
        {% for pair in c.metrics|batch(2) %}<tr>{% for label, value, ci in pair %}<td class="k">{{ label }}</td>
          <td>{{ value }}<span class="ci">{{ ci }}</span></td>{% endfor %}</tr>{% endfor %}
      </table><span class="note">95% bootstrap CIs, at the decision threshold.</span></dd>
      <dt>Limitations</dt><dd><ul class="limits">{% for text in limitations %}<li>{{ text }}</li>{% endfor %}</ul></dd>
    </dl>
  </div>
  {% endfor %}
  </div>
</section>
</main>
<footer>PneumoScope {{ version }} &middot; every number here can be recomputed from the run folders
  (metrics.json, predictions_*.csv)</footer>
</body>
</html>
"""
