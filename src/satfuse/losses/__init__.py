"""satfuse.losses"""
