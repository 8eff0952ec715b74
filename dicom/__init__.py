"""medsegagent.dicom"""
