"""Translation helpers for the compatibility routers (AWS Rekognition, CompreFace).

Pure functions only: no recognition logic lives here, the routers call the
same services as the native API and these modules only reshape the answers.
"""
