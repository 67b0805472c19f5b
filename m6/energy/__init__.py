"""Energy and carbon accounting: sensors (NVML, RAPL, estimates), the monitor, Prometheus export, reports."""
