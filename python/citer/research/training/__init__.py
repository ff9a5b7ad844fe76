"""Training: the demo pair's language models (lm.py) and CITER routers."""
