"""medfoundry.data"""
