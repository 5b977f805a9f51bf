"""satfuse.bench"""
