"""medfoundry.train"""
