"""Small shared utilities (data-parallel helpers)."""
