"""nbankctl: query the registry, run tape operations and control nbankd."""
