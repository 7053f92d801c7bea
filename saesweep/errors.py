"""User-facing errors: one line that names the key or file and what would be valid."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config or inputs. Printed as one line, no traceback."""
