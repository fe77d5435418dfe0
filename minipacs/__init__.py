"""minipacs: an asyncio DICOM archive."""
