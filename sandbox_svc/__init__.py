"""sandbox_svc"""
