"""Shared fixtures. Tests never touch ../shared or the network: images are synthetic."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Hub calls must fail fast here (no internet in CI), and caches stay inside the test run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def kermany_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Kermany-style tree (train/val/test x NORMAL/PNEUMONIA)."""
    from pneumoscope.data.synthetic import write_kermany_tree

    return write_kermany_tree(tmp_path_factory.mktemp("kermany") / "chest_xray", size=96, seed=0)


@pytest.fixture(scope="session")
def learnable_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger synthetic tree for the test that training must actually learn."""
    from pneumoscope.data.synthetic import write_kermany_tree

    counts = {"train": (80, 120), "val": (24, 30), "test": (40, 50)}
    return write_kermany_tree(tmp_path_factory.mktemp("learnable") / "chest_xray", counts,
                              size=64, seed=1)


DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, rows: int | None = None, cols: int | None = None,
                frames: int = 1, samples: int = 1, **elements: object) -> Path:
    """A small uncompressed single-file DICOM; ``elements`` become top-level attributes."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        shape = pixels.shape[-2:]
        ds.Rows, ds.Columns = rows or shape[0], cols or shape[1]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 0
        if samples > 1:
            ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)
    return path


def write_broken_jpeg2000_dicom(path: Path) -> Path:
    """A DICOM whose transfer syntax is JPEG 2000 and whose one fragment is not a valid
    codestream: every pixel decoder plugin fails on it."""
    from pydicom.uid import JPEG2000Lossless

    return write_compressed_dicom(path, JPEG2000Lossless, b"\xff\x4f\xff\x51" + b"\0" * 40)  # SOC + short SIZ


def write_compressed_dicom(path: Path, transfer_syntax: str, fragment: bytes) -> Path:
    """A DICOM whose pixel data is one encapsulated ``fragment`` under ``transfer_syntax``."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate

    write_dicom(path, np.zeros((16, 16), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path
