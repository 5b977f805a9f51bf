"""satfuse.launch"""
