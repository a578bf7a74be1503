// vcsim for reflex's tests: govmomi's VPX simulator on a chosen loopback port, with the
// REST (vapi) endpoints, credentials that are actually checked, and TLS.
//
// Build (GOPATH mode, Debian's golang-github-vmware-govmomi-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o target/vcsim ./crates/vsphere/vcsim
//
// It prints one line `URL=https://127.0.0.1:PORT/sdk THUMBPRINT=AA:BB:…` once it serves,
// then runs until stdin closes or it gets SIGTERM/SIGINT.
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	user := flag.String("username", "user", "login user name")
	pass := flag.String("password", "pass", "login password")
	plain := flag.Bool("plain", false, "serve plain HTTP instead of HTTPS")
	idle := flag.Duration("session-idle-timeout", 0, "expire idle sessions after this long (0: never)")
	datastores := flag.Int("ds", 2, "number of datastores")
	certOut := flag.String("cert-out", "", "write the server certificate (PEM) to this file")
	anyLogin := flag.Bool("any-login", false, "accept any non-empty user name and password (several users, each in its events' userName)")
	flag.Parse()

	if *idle > 0 {
		simulator.SessionIdleTimeout = *idle
	}
	m := simulator.VPX()
	m.Datastore = *datastores
	if err := m.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim: create:", err)
		os.Exit(1)
	}
	m.Service.RegisterEndpoints = true
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	if *anyLogin {
		// The simulator's own default login is the one that lets any user in.
		m.Service.Listen.User = simulator.DefaultLogin
	}
	if !*plain {
		// A fresh P-256 certificate for 127.0.0.1: the simulator's built-in one is RSA-1024,
		// which modern TLS stacks (rustls/webpki) refuse.
		cert, certPEM, err := selfSigned()
		if err != nil {
			fmt.Fprintln(os.Stderr, "vcsim: certificate:", err)
			os.Exit(1)
		}
		if *certOut != "" {
			if err := os.WriteFile(*certOut, certPEM, 0o644); err != nil {
				fmt.Fprintln(os.Stderr, "vcsim: -cert-out:", err)
				os.Exit(1)
			}
		}
		m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	s := m.Service.NewServer()
	s.Config.Handler = keepCollectors(s.Config.Handler)
	u := *s.URL
	u.User = nil
	thumb := ""
	if !*plain {
		sum := sha1.Sum(s.Server.TLS.Certificates[0].Certificate[0])
		parts := make([]string, len(sum))
		for i, b := range sum {
			parts[i] = fmt.Sprintf("%02X", b)
		}
		thumb = strings.Join(parts, ":")
	}
	fmt.Printf("URL=%s THUMBPRINT=%s\n", u.String(), thumb)
	os.Stdout.Sync()

	done := make(chan struct{}, 2)
	go func() {
		io.Copy(io.Discard, os.Stdin)
		done <- struct{}{}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		done <- struct{}{}
	}()
	<-done
	s.Close()
	m.Remove()
}

// keepCollectors answers DestroyCollector without running it. The simulator (govmomi
// 0.24) runs DestroyCollector holding the collector's lock and then takes the
// EventManager's, while PostEvent (and every task that posts an event) holds the
// EventManager's and then takes each collector's: a collector destroyed while an event is
// posted deadlocks the EventManager for good, and every later PostEvent hangs (seen in a
// CI run: a test's PostEvent timed out after 30 s while reflex's vCenter source destroyed
// its catch-up collector). A real vCenter has no such deadlock, so reflex still destroys
// its collectors; here they are kept until the simulator stops.
func keepCollectors(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.Body != nil {
			body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
			r.Body.Close()
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			if bytes.Contains(body, []byte("<DestroyCollector")) {
				w.Header().Set("Content-Type", "text/xml; charset=utf-8")
				io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><DestroyCollectorResponse xmlns="urn:vim25"></DestroyCollectorResponse></soapenv:Body></soapenv:Envelope>`)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
			r.ContentLength = int64(len(body))
		}
		next.ServeHTTP(w, r)
	})
}

// selfSigned makes a CA and a server certificate for 127.0.0.1 signed by it; the CA's PEM
// is what -cert-out writes (a client's `ca_file`).
func selfSigned() (tls.Certificate, []byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	caTmpl := x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vcsim test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, &caTmpl, &caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "vcsim.reflex.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return cert, caPEM, err
}
