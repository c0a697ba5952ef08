"""The one scorer (used by evaluate and by the promotion gate), the reports and pictures."""
