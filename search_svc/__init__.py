"""search_svc"""
