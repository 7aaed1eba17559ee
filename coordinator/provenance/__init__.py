"""The coordinator's side of the provenance log: `JobRecorder`, its one writer."""
