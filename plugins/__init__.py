"""The shipped plugins (installed as the package wsgate_plugins)."""
