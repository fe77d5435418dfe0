"""Benchmarks: minipacs against peers (DCMTK, Orthanc) measured in the same run."""
