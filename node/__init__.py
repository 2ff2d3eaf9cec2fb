"""lungnode: a DICOM inference node for chest CT. Reference models, not cleared for clinical use."""

__version__ = "0.1.0"

#: Manufacturer written into every object this node creates; used to recognise them when a PACS
#: sends them back.
MANUFACTURER = "lungnode"

#: Implementation Class UID (PS3.7 D.3.3.2) sent in every association and written in the File Meta of
#: every object the node creates: a PACS's logs then name this software, not the DICOM toolkit. Fixed
#: for good (the UUID-derived form of PS3.5 B.2, of the name "implementation.lungnode"); the version
#: name below tells releases apart.
IMPLEMENTATION_CLASS_UID = "2.25.107029883698426032045452956545573898504"
#: Implementation Version Name: at most 16 characters.
IMPLEMENTATION_VERSION_NAME = f"LUNGNODE_{__version__}"[:16]
