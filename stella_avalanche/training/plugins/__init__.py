"""training/plugins"""
