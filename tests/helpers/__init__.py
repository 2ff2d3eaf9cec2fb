"""Small reusable helpers for the lungnode test suite: ports, waiting, a node subprocess, dcmtk and
pynetdicom peers, and a tiny DICOM series generator."""
