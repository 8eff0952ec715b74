"""medsegagent.models"""
