"""The microVM metadata service (MMDS): data store access, V1/V2 HTTP service and the
small ARP/IPv4/TCP stack that answers the guest on a network interface."""
