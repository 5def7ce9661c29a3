"""Export for apps: the model an app calls (uint8 pixels in, calibrated probabilities out), the
formats and their exporters, the int8 quantiser, the metadata and the parity check."""
