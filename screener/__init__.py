"""CXR Screener: a DICOM chest X-ray screening daemon."""

__version__ = "0.1.0"
