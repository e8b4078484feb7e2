"""Hugging Face interop: parameter conversion both ways, HF folders in and out, export, vocabulary growth."""
