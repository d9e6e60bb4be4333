#!/usr/bin/perl
# Perl's Net::Server::PreFork (Debian's libnet-server-perl) as a benchmark peer.
#
# Usage: perl netserver_prefork.pl [PORT] [WORKERS]   (PORT 0: the kernel picks one)
# Prints the bound port on stdout, then serves until SIGTERM/SIGINT.
# A pool of WORKERS (default 4) servers, min = max, and max_requests so large that a
# child never recycles during a benchmark.
# Protocol: "PING" -> "+PONG", any other line echoed; LF or CRLF in, CRLF out.
use strict;
use warnings;

package PingPong;
use base qw(Net::Server::PreFork);
use Socket qw(IPPROTO_TCP TCP_NODELAY);

sub post_bind_hook {
    my $self = shift;
    my $sock = $self->{'server'}->{'sock'}->[0];
    local $| = 1;
    print STDOUT $sock->sockport, "\n";
}

sub process_request {
    my $self = shift;
    my $c = $self->{'server'}->{'client'};
    setsockopt($c, IPPROTO_TCP, TCP_NODELAY, 1);
    $c->autoflush(1);
    while (defined(my $line = <$c>)) {
        $line =~ s/\r?\n\z//;
        print $c ($line eq 'PING' ? "+PONG\r\n" : "$line\r\n");
    }
}

package main;

my $port    = shift @ARGV // 0;
my $workers = shift @ARGV // 4;
PingPong->run(
    host              => '127.0.0.1',
    port              => $port,
    ipv               => 4,
    proto             => 'tcp',
    listen            => 1024,
    min_servers       => $workers,
    max_servers       => $workers,
    min_spare_servers => 1,
    max_spare_servers => $workers - 1,
    max_requests      => 1_000_000_000,
    log_level         => 0,
    background        => undef,
    setsid            => undef,
);
