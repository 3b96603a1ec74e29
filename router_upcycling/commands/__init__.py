"""The user-facing commands (console scripts; tools/*.py are thin wrappers around them)."""
