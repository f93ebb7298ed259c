"""Offline data: ShareGPT conversations, MT-Bench questions, and the trigram datastore."""
