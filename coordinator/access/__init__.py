"""Who may act: onboarding and PKI files, the node registry, SuperNode keys, refusal watchers."""
