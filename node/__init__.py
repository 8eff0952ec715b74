"""medsegagent.node"""
