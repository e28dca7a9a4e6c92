"""Thin Prefect tasks: caching, retries, tags and artifacts around dermt2im domain functions."""
