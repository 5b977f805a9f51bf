"""satfuse.distributed"""
