"""value_svc"""
