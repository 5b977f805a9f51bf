"""satfuse.evaluation"""
