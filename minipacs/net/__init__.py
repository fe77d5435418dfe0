"""The DICOM Upper Layer (PS3.8) and DIMSE message transport (PS3.7) on asyncio."""
