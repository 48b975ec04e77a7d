"""Deploying at a new site: recalibrate a checkpoint on local labelled films
(:mod:`~pneumoscope.site.calibrate`) and adapt its BatchNorm statistics to local unlabelled
films (:mod:`~pneumoscope.site.adapt`). Each step writes a new checkpoint that records itself in
``CheckpointInfo.provenance``; the input file is never modified. Honest (held-out) numbers for
both: ``benchmarks/site.py``."""
