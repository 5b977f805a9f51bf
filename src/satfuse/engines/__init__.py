"""satfuse.engines"""
