"""The study file: its schema, loading and checks, what --smoke and --dry-run make of it, how an edit
extends a study, and how its values resolve into trial configurations."""
