"""ADB evaluation: synthetic default data, judges, drift metrics, reports and the end-to-end demo."""
