"""trainer_svc"""
