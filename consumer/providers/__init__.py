"""The providers: one package each (consumer/providers/<slug>/), what a package gives (spec.py), the registry."""
