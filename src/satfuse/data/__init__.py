"""satfuse.data"""
