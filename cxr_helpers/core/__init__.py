"""Plumbing every concern shares: errors, atomic file writes, the names of every file and folder, where this runs, the GPU, output ownership."""
