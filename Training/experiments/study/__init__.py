"""The comparison study of ``compare_methods.py`` (its entry point), by concern."""
