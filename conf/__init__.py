"""Hydra configs, a package so an installed netcompress (``netcompress ...``) finds them as pkg://netcompress.conf."""
