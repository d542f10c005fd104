"""Backbone features computed once for a frozen backbone, and where they are kept."""
