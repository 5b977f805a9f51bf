"""satfuse.checkpoint"""
