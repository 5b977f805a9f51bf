"""satfuse.models"""
