"""lungnode: a DICOM inference node for chest CT. Reference models, not cleared for clinical use."""

__version__ = "0.1.0"

#: Manufacturer written into every object this node creates; used to recognise them when a PACS
#: sends them back.
MANUFACTURER = "lungnode"
