"""Virt: VMs on libvirt, drives, events, snapshot, replication, watermark monitor."""
