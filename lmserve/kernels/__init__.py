"""Native CPU kernels that torch does not provide, compiled on first use and called through ctypes."""
